"""Training: the run (setup and its directory), the fit loop and what it leans on."""
