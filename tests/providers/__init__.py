"""Real provider software the tests run against (``node_oidc``: node oidc-provider), and what
stands between it and the apps (``proxy``)."""
