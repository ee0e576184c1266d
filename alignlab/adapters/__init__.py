"""alignlab.adapters"""
