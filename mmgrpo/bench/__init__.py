"""Benchmarks against reference implementations (run as `python -m mmgrpo.bench.<name>`)."""


def status_bytes(key: str) -> int:
    """A memory figure of this process from /proc/self/status ("VmHWM", "RssAnon", ...), in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {key}")
