"""alignlab.decoding"""
