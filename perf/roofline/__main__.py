from perf.roofline.cli import main

main()
