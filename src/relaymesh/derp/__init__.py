"""derp"""
