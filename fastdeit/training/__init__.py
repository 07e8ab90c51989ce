"""Training: the run's parts composed (build), one step (step), the loop (trainer), evaluation
(evaluate), the run folder and checkpoints (rundir), its meters, progress bar and metric sinks."""
