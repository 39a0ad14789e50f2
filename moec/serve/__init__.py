"""After training: load a run's weights, generate (KV cache), evaluate, serve over HTTP.

``load.load_trained`` is ``moec.load_trained``; ``generate`` holds the token generator and
the continuous rollout, ``sampling`` the next-token choice, ``evaluate`` ``moec eval``'s
numbers, ``server`` the FastAPI app of ``moec serve`` (the optional ``[serve]`` extra).
"""
