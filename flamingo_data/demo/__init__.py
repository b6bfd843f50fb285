"""The bundled sample and the demo run."""
