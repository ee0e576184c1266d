"""alignlab.quant"""
