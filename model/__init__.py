"""The LongCat-Flash model on a moeport Runtime."""
