"""`tunelab ui`: a local web app (Gradio) over the same functions as the CLI.

    tunelab ui                      # http://127.0.0.1:7860, runs under ./runs
    tunelab ui --runs DIR --port N  # --share only when asked: nothing here authenticates requests

Every tab builds its components in its own module, with one entry point `build_tab(ctx)`:

    context.py   UIContext: where runs and jobs live            app.py      the tabs, composed; launch()
    jobs.py      CLI commands run in the background (detached, survive the browser tab and the UI itself)

Training, compare and export launched from the UI are ordinary `tunelab` commands in their own
processes (jobs.py), so a run started here is a run folder the CLI resumes, and closing the tab or
the UI stops nothing.
"""
