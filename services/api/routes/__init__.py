"""The api's routes, one module a concern; `create_app` (app.py) includes their routers."""
