"""What a run leaves on disk to resume from: DCP checkpoints and their verification, the run directory's rules, the compile cache."""
