"""The thin Ray Serve layer over the hotswap library: the model replica, the HTTP ingress, ``build_app``."""
