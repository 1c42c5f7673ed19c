"""RRHF (Yuan et al. 2023): ranking K scored responses per prompt plus cross-entropy on the best
(``step``), its candidate sets (``data``) and the stage (``run``)."""
