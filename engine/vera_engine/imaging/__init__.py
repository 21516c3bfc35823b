"""Plates in, layers out, with no model involved: EXR reading and writing, OpenColorIO conversions, fitting
plates to the model's size and back, compositing, previews, and `edit_plate` (the whole path around one
sampling call)."""
