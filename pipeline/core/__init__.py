"""What every floor above uses: errors, the console, child processes, data files and their
typed reader, the project's layout and version.json."""
