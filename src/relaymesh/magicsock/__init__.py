"""magicsock"""
