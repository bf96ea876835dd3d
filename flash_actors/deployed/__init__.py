"""Deployed code: one built resource's functions, served from its manifest.

- `flash_actors.deployed.handler`: `load_resource` imports the functions that the manifest
  lists for one resource (keys ``module:qualname``); `DeployedHandler` answers a job's
  ``input`` (Flash's deployed-mode JSON, or a signed `FunctionRequest` without code).
- `flash_actors.deployed.serve`: `main`, what a generated ``handler_<resource>.py`` runs.
- `flash_actors.deployed.app`: the HTTP side (aiohttp): the executor and routes of our
  worker's deployed mode, and the standalone app of a load-balanced resource.

A deployed worker runs only the code it was built with: a request that carries code
(``function_code`` or ``class_code``) is refused.
"""
