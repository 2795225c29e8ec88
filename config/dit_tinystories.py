# The name the README's usage line has always used: the `embed` family's GPU config, config/embed_tinystories.py.
from config.embed_tinystories import *  # noqa: F401,F403
