# Read (never imported) by test_structure.py to prove the import checker sees every import form.
import torch
from ray import data
from llada_core.model import LLaDAMoEModelLM
