"""disco"""
