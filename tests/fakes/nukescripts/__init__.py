"""A fake of the part of ``nukescripts`` the Vera adapter uses (tests only): ``nukescripts.panels``."""

from . import panels

__all__ = ["panels"]
