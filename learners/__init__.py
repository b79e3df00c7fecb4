"""Learning side of dloop: pure learning on Vowpal Wabbit, with no database, broker or HTTP
(service.pipeline feeds it). Nothing here imports service/."""
