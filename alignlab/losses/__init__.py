"""alignlab.losses"""
