"""``aerial-search serve``: the store searched from a map page and an HTTP JSON API.

- :mod:`pipeline.serve.service`: the answers (an in-memory :class:`~pipeline.search.SearchIndex`,
  requests parsed and refused with one-line errors, searches batched on one thread);
- :mod:`pipeline.serve.basemap`: footprints, XYZ tiles and previews read from the archive;
- :mod:`pipeline.serve.app`: the FastAPI routes, the token guard, body caps, the page;
- ``static/``: the page (plain JavaScript on Leaflet, shipped in ``static/vendor/leaflet``: package data).
"""
