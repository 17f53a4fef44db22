"""The import boundaries and the task boundary, read from the source (the AST, so imports inside
functions count too), plus what importing the light modules actually loads."""
import ast
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

REPO = Path(__file__).resolve().parents[2]
SEAM = REPO / "launcher" / "ray_job.py"  # the one module that talks to Ray on the workers' behalf


def imports(path: Path) -> Iterator[tuple[int, str]]:
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from ((node.lineno, a.name) for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield node.lineno, node.module


def hits(folder: str, banned: str) -> list[str]:
    return [f"{f.relative_to(REPO)}:{line} {name}" for f in sorted((REPO / folder).rglob("*.py"))
            for line, name in imports(f) if name == banned or name.startswith(banned + ".")]


@pytest.mark.parametrize("folder, banned", [("trainer", "launcher"), ("trainer", "ray"), ("launcher", "deepspeed")])
def test_imports_run_one_way(folder, banned):
    assert not hits(folder, banned)


@pytest.mark.parametrize("module, banned", [
    ("trainer/config.py", "trainer.tasks"),  # the schema: what a task is, it reads nowhere (config_checks does)
    ("trainer/config_checks.py", "trainer.tasks.causal_lm"),  # the registry's table, never a task module
    ("launcher/search_space.py", "ray"),  # the space is pure; launcher/tune.py turns it into Ray Tune's
])
def test_a_module_keeps_off(module, banned):
    found = [name for _, name in imports(REPO / module) if name == banned or name.startswith(banned + ".")]
    assert not found


def test_the_schema_imports_only_the_stdlib():
    """Both sides import it and it sits at the bottom: no yaml, no task code, no other trainer module."""
    found = [name for _, name in imports(REPO / "trainer" / "config.py")
             if name.split(".")[0] not in sys.stdlib_module_names and name != "__future__"]
    assert not found


def test_the_config_checks_import_no_task_module():
    from trainer.tasks.registry import TASKS

    modules = {spec.module for spec in TASKS.values()} | {"trainer.tasks.common"}
    assert not [name for _, name in imports(REPO / "trainer" / "config_checks.py") if name in modules]


def test_the_boundary_check_sees_imports_inside_functions(tmp_path, monkeypatch):
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from launcher.cli import main\n    import ray.train\n")
    assert [name for _, name in imports(probe)] == ["launcher.cli", "ray.train"]


def test_ray_is_used_by_the_launcher_only():
    # bench/startup.py times Ray Train on its own (the floor of any Ray Train launcher): not product code.
    users = {f.relative_to(REPO).parts[0] for f in REPO.rglob("*.py") if ".venv" not in f.parts
             and "tests" not in f.parts and any(n == "ray" or n.startswith("ray.") for _, n in imports(f))}
    assert users - {"bench"} == {"launcher"}


def task_names() -> set[str]:
    from trainer.tasks.registry import TASKS

    return set(TASKS)


def task_name_uses(path: Path) -> list[str]:
    """Where a file names a task: a string constant equal to a task name, or a comparison with a
    `.task` attribute. The config's default value is the one place allowed to name one."""
    tree, names, found = ast.parse(path.read_text()), task_names(), []
    allowed = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.AnnAssign)
               and isinstance(n.target, ast.Name) and n.target.id == "task" and n.value is not None}
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and node.value in names and id(node) not in allowed:
            found.append(f"{path.relative_to(REPO)}:{node.lineno} {node.value!r}")
        if isinstance(node, ast.Compare) and any(isinstance(x, ast.Attribute) and x.attr == "task"
                                                 for x in [node.left, *node.comparators]):
            found.append(f"{path.relative_to(REPO)}:{node.lineno} compares .task")
    return found


def test_no_code_outside_the_task_modules_compares_the_task_name():
    files = [f for folder in ("launcher", "trainer") for f in (REPO / folder).rglob("*.py")
             if (REPO / "trainer" / "tasks") not in f.parents]
    assert not [hit for f in files for hit in task_name_uses(f)]


def test_the_task_check_finds_a_comparison(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    probe = tmp_path / "probe.py"
    probe.write_text("def f(cfg):\n    if cfg.model.task == 'x':\n        return {'causal_lm': 1}\n")
    assert task_name_uses(probe) == ["probe.py:2 compares .task", "probe.py:3 'causal_lm'"]


def test_every_registered_task_implements_the_interface():
    from trainer.tasks.registry import TASKS, Task, get_task

    members = [m for m in dir(Task) if not m.startswith("_")] + list(Task.__annotations__)
    for name in task_names():
        module, spec = get_task(name), TASKS[name]
        assert all(hasattr(module, m) for m in members), name
        assert hasattr(module, "pack") == spec.packs and hasattr(module, "generate") == spec.generates, name
        assert spec.metrics[0] == "loss", name  # early stopping and tune.metric default to it


def test_what_a_task_is_lives_in_the_registry_only():
    """TaskSpec is the one copy of a task's capabilities: no task module keeps its own constants."""
    old = {"AUTO_MODEL", "PROCESSOR", "UNIT", "PACKS", "GENERATES", "METRICS"}
    found = [f"{f.relative_to(REPO)}:{node.lineno} {t.id}" for f in sorted((REPO / "trainer" / "tasks").glob("*.py"))
             for node in ast.parse(f.read_text()).body if isinstance(node, (ast.Assign, ast.AnnAssign))
             for t in (node.targets if isinstance(node, ast.Assign) else [node.target])
             if isinstance(t, ast.Name) and t.id in old]
    assert not found


@pytest.mark.parametrize("module, banned", [
    ("launcher.cli", "deepspeed"), ("launcher.cli", "torch"), ("launcher.cli", "ray"),
    ("trainer.config", "torch"), ("launcher.controller", "deepspeed"), ("trainer.tasks.registry", "torch"),
    ("trainer.loop", "ray"), ("trainer.freezing", "torch"), ("trainer.config_load", "torch"),
    ("trainer.config", "trainer.tasks.registry"), ("trainer.config_load", "trainer.tasks.causal_lm"),
    ("launcher.search_space", "ray"), ("launcher.search_space", "torch")])
def test_importing_a_light_module_loads_no_heavy_one(module, banned):
    probe = f"import sys, {module}; sys.exit({banned!r} in sys.modules)"
    assert subprocess.run([sys.executable, "-c", probe]).returncode == 0, f"{module} imports {banned}"


def test_only_the_tracking_backend_writes_tensorboard():
    """Every metric flows through launcher/tracking.py (one writer per run): no other product module
    imports a TensorBoard writer."""
    writers = ("torch.utils.tensorboard", "tensorboard", "tensorboardX")
    users = {str(f.relative_to(REPO)) for folder in ("launcher", "trainer") for f in (REPO / folder).rglob("*.py")
             if any(n == w or n.startswith(w + ".") for _, n in imports(f) for w in writers)}
    assert users == {"launcher/tracking.py"}


def private_uses(path: Path) -> list[str]:
    """Where a file reaches into another of the project's modules for a name it keeps private
    (`module._name`, `from module import _name`)."""
    tree = ast.parse(path.read_text())
    ours = ("launcher", "trainer")
    modules = {a.asname or a.name.split(".")[-1] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
               and n.module in ours for a in n.names}
    modules |= {a.asname or a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names
                if a.name.split(".")[0] in ours}
    found = [f"{path.relative_to(REPO)}:{n.lineno} {n.value.id}.{n.attr}" for n in ast.walk(tree)
             if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id in modules
             and n.attr.startswith("_") and not n.attr.startswith("__")]
    found += [f"{path.relative_to(REPO)}:{n.lineno} from {n.module} import {a.name}" for n in ast.walk(tree)
              if isinstance(n, ast.ImportFrom) and (n.module or "").split(".")[0] in ours for a in n.names
              if a.name.startswith("_")]
    return found


def test_no_module_uses_another_modules_private_names():
    files = [f for folder in ("launcher", "trainer") for f in (REPO / folder).rglob("*.py")]
    assert not [hit for f in files for hit in private_uses(f)]


def test_the_private_name_check_finds_both_forms(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    probe = tmp_path / "probe.py"
    probe.write_text("from launcher import controller\nfrom trainer.loop import _x\n"
                     "def f():\n    return controller._next_attempt(1)\n")
    assert sorted(private_uses(probe)) == ["probe.py:2 from trainer.loop import _x",
                                           "probe.py:4 controller._next_attempt"]


def test_every_worker_group_starts_in_one_place():
    """One orchestration: a plain run, each search trial and the search's test group all start their
    worker group through controller.run_group; nothing else calls ray_job.fit or builds WorkerArgs
    by hand (controller.training_args / test_args build them)."""
    def calls(path: Path, name: str) -> list[int]:
        return [n.lineno for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Call)
                and (getattr(n.func, "attr", None) == name or getattr(n.func, "id", None) == name)]

    files = sorted((REPO / "launcher").rglob("*.py"))
    fits = {str(f.relative_to(REPO)) for f in files if calls(f, "fit") and f.name != "ray_job.py"}
    assert fits == {"launcher/controller.py"}  # run_group, the one caller (ray_job's own fits are Ray's)
    builders = {str(f.relative_to(REPO)) for f in files if calls(f, "WorkerArgs")}
    assert builders == {"launcher/controller.py"}
