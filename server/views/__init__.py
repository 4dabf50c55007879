"""Read models of kernels, runs, versions and experiences: what the dashboard and the terminal show."""
