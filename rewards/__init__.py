"""mmgrpo.rewards. This folder is installed as `mmgrpo.rewards`; never import it as bare `rewards`."""

if __name__ != "mmgrpo.rewards":
    raise ImportError(
        "This is mmgrpo's 'rewards' folder: import it as 'mmgrpo.rewards' "
        "(after 'pip install -e .'), not as bare 'rewards'."
    )
