"""The evaluation report: numbers from the files a run leaves, plots, and the pages."""
