"""HTTP routes: thin and async; the work happens in `app.serving` and the workers."""
