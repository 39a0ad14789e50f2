"""What a run shows: metrics rows and loggers, plots, the progress display, memory and MFU measurements, ``moec inspect`` reports."""
