"""alignlab.data"""
