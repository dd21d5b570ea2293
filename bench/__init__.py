"""orgsync's benchmarks: workload, load client, processes and report, shared by run.py and reconcile.py."""
