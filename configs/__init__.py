"""mmgrpo.configs. This folder is installed as `mmgrpo.configs`; never import it as bare `configs`."""

if __name__ != "mmgrpo.configs":
    raise ImportError(
        "This is mmgrpo's 'configs' folder: import it as 'mmgrpo.configs' "
        "(after 'pip install -e .'), not as bare 'configs'."
    )
