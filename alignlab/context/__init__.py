"""alignlab.context"""
