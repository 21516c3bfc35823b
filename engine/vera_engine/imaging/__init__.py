"""Plates in, layers out, with no model involved: EXR reading and writing, OpenColorIO conversions, fitting
plates to the model's size and back, compositing, previews, and the layers at plate resolution from what the model
made (`plate_layers`). The sampling call itself is `vera_engine.pipelines.edit_plate`."""
