"""Worker processes for the multi-process coordination tests: an app (``app.py``) and the code
that runs several copies of it under uvicorn (``cluster.py``)."""
