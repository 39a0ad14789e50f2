"""Training data: the dataset kinds a spec names (text, signals, trajectories, random tokens, Hugging Face dataset files, token files) and ``moec data prepare``."""
