"""Files: the base checkpoint reader, safetensors reading and writing, hashing, atomic output.

Also the strict JSON reader every input goes through.
"""
