"""selfalign: a DVC pipeline that turns a small seed set and a web corpus into a chat model."""

__version__ = "0.1.0"
