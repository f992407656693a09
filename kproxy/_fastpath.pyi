# The compiled renderer is kproxy/_purepath.py compiled by Cython (setup.py): same signatures.
from kproxy._purepath import *  # noqa: F401,F403
