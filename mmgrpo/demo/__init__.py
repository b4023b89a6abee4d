"""The Gradio demo (`mmgrpo demo RUN_DIR`, extra `demo`): a run's base and trained policies side by side.

    policies.py   load a run's two policies as training built them; one seeded comparison, scored
    inputs.py     the prompt of a comparison from the page (picker, typed text, uploads), checked
    views.py      one natural view per modality and the score table (plain functions)
    app.py        the page: the Compare tab
    runs_tab.py   the Run tab: evaluation galleries, reward curves, eval.json's table
    server.py     the checks before the server starts, and the server

Gradio is imported only when the page is built, so `import mmgrpo.demo` stays light.
"""

from mmgrpo.demo.server import launch

__all__ = ["launch"]
