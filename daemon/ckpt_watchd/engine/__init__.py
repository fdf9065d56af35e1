"""The torch side: safe load, strip, verified save, the zip writer, atomic replacement."""
