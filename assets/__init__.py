"""mmgrpo.assets: the embedded tiny models and their model cards. Installed as `mmgrpo.assets`."""

from pathlib import Path

if __name__ != "mmgrpo.assets":
    raise ImportError("This is mmgrpo's 'assets' folder: import it as 'mmgrpo.assets', not as bare 'assets'.")


def asset_path(name: str) -> Path:
    """The folder of an embedded model, e.g. asset_path('clip'); a clear error if it was never built."""
    path = Path(__file__).parent / name
    if not path.exists():
        raise FileNotFoundError(
            f"embedded asset '{name}' is missing from {path.parent}: rebuild it with the command in its model card "
            f"(python -m mmgrpo.pretrain.{name})"
        )
    return path
