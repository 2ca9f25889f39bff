"""The inspection web page (embedstore ui)."""
