"""The launcher's console lines: `[sft] ...`, flushed at once (the driver's lines and, relayed by the
controller, rank 0's). Stdlib only."""


def say(text: str) -> None:
    print(f"[sft] {text}", flush=True)
