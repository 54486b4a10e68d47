"""The embedded tiny text-to-3D model: procedural shapes (``shapes``), the DiT (``model``), training (``train``) and
generation with mesh / point-cloud export (``generate``)."""
