"""Detection, tracking, label votes and drawing: everything that sees metadata."""
