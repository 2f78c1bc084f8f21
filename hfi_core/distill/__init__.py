"""Fine-tuning that erases a concept: SDD (self-distillation) and ESD-x."""
