"""alignlab.merging"""
