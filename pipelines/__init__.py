"""mmgrpo.pipelines. This folder is installed as `mmgrpo.pipelines`; never import it as bare `pipelines`."""

if __name__ != "mmgrpo.pipelines":
    raise ImportError(
        "This is mmgrpo's 'pipelines' folder: import it as 'mmgrpo.pipelines' "
        "(after 'pip install -e .'), not as bare 'pipelines'."
    )
